"""The participant side of fieldchat: identity, key store, the E2E engine and (soon) the MQTT client."""
