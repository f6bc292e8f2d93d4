"""`python -m core.host --config FILE`: how a front starts the model host."""
from core.host.server import main

main()
