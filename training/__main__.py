"""`python -m training RUN_DIR`: what torchrun starts on every rank."""
import sys

from .loop import train


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: python -m training RUN_DIR", file=sys.stderr)
        return 2
    return train(sys.argv[1])


if __name__ == "__main__":
    sys.exit(main())
