"""The gateway: encrypted history archive, history API, accounts and the WebSocket bridge."""
