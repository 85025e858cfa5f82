"""Everything that runs before the ranks: the launcher (cli), the commands that start the ranks, the checks and the
pre-flight estimate, signal forwarding, and Slurm submission (slurm)."""


from finetune_launcher.errors import UserError


class LaunchError(UserError):
    """A launcher option or machine layout problem a user can fix."""
