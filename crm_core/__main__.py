"""``python -m crm_core`` runs the ``crm`` command."""

from crm_core.cli import main

main()
