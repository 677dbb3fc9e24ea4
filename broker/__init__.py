"""The embedded MQTT broker (hardened aMQTT) and generated production broker configuration."""
