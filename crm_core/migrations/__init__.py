"""The database schema's migrations (Alembic), and the revisions this code knows.

Why the list here as well as in ``versions/``: every command checks the schema before
it touches the database, and Alembic (a tenth of a second to import) is loaded only by
``crm init``. A test checks that this list matches Alembic's history, oldest first.
"""

REVISIONS = ("0001", "0002", "0003", "0004", "0005", "0006", "0007", "0008")
"""Every schema revision, oldest first; the last one is the newest this code knows."""
