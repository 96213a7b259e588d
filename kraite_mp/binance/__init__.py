"""The exchange edge: everything that knows Binance's wire format (REST, user-data, market payloads)."""
