"""``python -m deploy.serve`` is ``nsn-serve``."""

from .cli import serve_command

serve_command()
