"""The streaming server (port 8083): all of its behaviour lives in core; this only names it."""
from core.front.app import main


def run() -> None:
    main("streaming")


if __name__ == "__main__":
    run()
