"""`python -m zerotune.training RUN_DIR`: what torchrun starts on every rank."""
import sys
import warnings

# DeepSpeed 0.19 calls torch.distributed APIs that torch 2.11+ deprecates, once per collective:
# silence exactly those, so the console shows the run.
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)

from . import faults  # noqa: E402
from .loop import train  # noqa: E402


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: python -m zerotune.training RUN_DIR", file=sys.stderr)
        return 2
    faults.install_from_env()  # tests only: patches nothing unless a ZEROTUNE_TEST_* variable is set
    return train(sys.argv[1])


if __name__ == "__main__":
    sys.exit(main())
