"""The consensus server (port 8084): all of its behaviour lives in core; this only names it."""
from core.front.app import main


def run() -> None:
    main("consensus")


if __name__ == "__main__":
    run()
