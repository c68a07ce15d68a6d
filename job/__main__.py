"""`python -m job`: the same as entrypoint.py; torchrun starts each rank this way (see launch.py)."""
from job.cli import app

app()
