"""crm-mail test suite."""
