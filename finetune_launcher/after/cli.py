"""Command-line glue for tools/: user errors become one ASCII line and exit 2."""
from finetune_launcher import exit_codes
from finetune_launcher.after.loading import AdapterError

def run_tool(main):
    """Run a tool's main(); errors a user can fix print one ASCII line `error: ...` and exit 2."""
    import sys

    from finetune_launcher.console import ascii_safe, make_console_safe

    make_console_safe()
    try:
        code = main()
    except Exception as error:  # noqa: BLE001 -- only user errors are turned into a one-line message
        if not isinstance(error, user_error_types()):
            raise
        print(ascii_safe(f"error: {error}"), file=sys.stderr, flush=True)
        code = exit_codes.USER_ERROR
    except KeyboardInterrupt:
        code = exit_codes.INTERRUPTED
    sys.exit(code or 0)


def user_error_types():
    """AdapterError, FileNotFoundError and, once finetune_launcher.data is loaded, DataError. Looked up lazily so that a tool
    can fail on a wrong path without importing torch first."""
    import sys

    data = sys.modules.get("finetune_launcher.data.records")
    return (AdapterError, FileNotFoundError) + ((data.DataError,) if data else ())
