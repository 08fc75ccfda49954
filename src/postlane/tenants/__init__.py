"""Tenancy: accounts, SMTP users and sending domains, as the operator manages them."""
