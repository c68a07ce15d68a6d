"""Container entrypoint: all logic lives in job.cli."""
from job.cli import app

if __name__ == "__main__":
    app()
