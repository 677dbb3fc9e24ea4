"""The participant side of fieldchat.

Identity and key store, the pure E2E engine, and the paho-mqtt ``Device`` client
with its durable outbox (see docs/device.md).
"""
