"""The project's two exceptions and the scripts' entry point.

Shared modules never end the process: a predictable mistake or fault (a bad flag, a damaged file, a folder in use)
raises UserError, whose message is one line naming the file or flag and the fix; a run stopped by SIGINT/SIGTERM after
saving what can be resumed raises Interrupted. Only a script's entry point, `errors.main_entry`, turns them into that
line on stderr and exit status 1, so one script can call another's main() (compare.py runs many) without being ended
by it.
"""
import sys


class UserError(Exception):
    """Something the user can fix; str(e) says what is wrong and what to do (no "error: " prefix)."""


class Interrupted(Exception):
    """A run or a cache build stopped by a signal, leaving everything resumable; str(e) says how to go on."""

    def __init__(self, message, signal_name):
        super().__init__(message)
        self.signal_name = signal_name


_before_exit = []


def before_exit(hook):
    """Have main_entry call hook(status) once main has ended, before the process exits (distributed.py uses it)."""
    _before_exit.append(hook)


def main_entry(main, get_args_parser, argv=None):
    """`if __name__ == "__main__": errors.main_entry(main, get_args_parser)`: parse the command line (or argv), run
    main, and turn the project's exceptions into one line and exit status 1 (argparse's own errors keep status 2)."""
    args = get_args_parser().parse_args(argv)
    message = None
    try:
        main(args)
    except Interrupted as e:
        message = str(e)
    except UserError as e:
        message = f"error: {e}"
    if message:
        print(message, file=sys.stderr)
    status = 1 if message else 0
    for hook in _before_exit:
        hook(status)
    if status:
        sys.exit(status)
