"""The long-lived children: one blocking WebSocket each (user data per account, mark price)."""
