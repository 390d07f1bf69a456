"""``python -m kvmtrace [COMMAND] [OPTIONS]`` = ``kvmtrace [COMMAND] [OPTIONS]``."""

from .cli import main

if __name__ == "__main__":
    main()
