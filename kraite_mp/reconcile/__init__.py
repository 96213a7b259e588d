"""REST reconciliation: the safety net that closes the gaps a user-data stream cannot."""
