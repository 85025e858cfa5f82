"""Command-line glue for the tools after training (`ftl evaluate`, ...): user errors become one ASCII line and exit
2."""
from finetune_launcher import exit_codes
from finetune_launcher.after.run_files import AdapterError
from finetune_launcher.errors import UserError


def tool_exit_code(main, argv=None):
    """main(argv)'s exit code; an error a user can fix prints one ASCII line `error: ...` and gives 2."""
    import sys

    from finetune_launcher.console import ascii_safe, make_console_safe

    make_console_safe()
    try:
        return main(argv) or 0
    except Exception as error:  # noqa: BLE001 -- only user errors are turned into a one-line message
        if not isinstance(error, user_error_types()):
            raise
        print(ascii_safe(f"error: {error}"), file=sys.stderr, flush=True)
        return exit_codes.USER_ERROR
    except KeyboardInterrupt:
        return exit_codes.INTERRUPTED


def user_error_types():
    """AdapterError, UserError, FileNotFoundError and, once finetune_launcher.data is loaded, DataError. Looked up
    lazily so that a tool can fail on a wrong path without importing torch first."""
    import sys

    data = sys.modules.get("finetune_launcher.data.records")
    return (AdapterError, UserError, FileNotFoundError) + ((data.DataError,) if data else ())
