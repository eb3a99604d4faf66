"""``emloc`` and ``python -m emloc``: relaunch with the compact heap (:mod:`emloc.heap`), then the CLI."""
import sys


def main() -> int:
    from emloc.heap import relaunch_with_compact_heap
    relaunch_with_compact_heap()
    from emloc.cli import main as cli_main
    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
