"""The ``shrinkfleet`` command line.

Exit codes: 0 every model finished; 1 at least one model failed (the report names it);
2 bad input (params, data, paths), reported before any work starts; 3 another run holds the
workspace and ``--if-busy refuse`` was given.
"""

# Each module adds its commands, in this order in --help.
from shrinkfleet.cli import run, schedule  # noqa: I001, F401
from shrinkfleet.cli import pipeline, registry, storage  # noqa: F401
from shrinkfleet.cli.common import app
from shrinkfleet.cli.schedule import validate_schedule

__all__ = ["app", "main", "validate_schedule"]


def main() -> None:  # pragma: no cover
    """The ``shrinkfleet`` command."""
    app(prog_name="shrinkfleet")


if __name__ == "__main__":  # pragma: no cover
    main()
