"""The standard server (port 8082): all of its behaviour lives in core; this only names it."""
from core.front.app import main


def run() -> None:
    main("standard")


if __name__ == "__main__":
    run()
