"""fieldchat: end-to-end encrypted chat over MQTT.

One installable namespace: :mod:`fieldchat.schemas` (the wire), :mod:`fieldchat.device`
(a participant), :mod:`fieldchat.broker` (the embedded broker, extra ``broker``) and
:mod:`fieldchat.gateway` (history and web users, extra ``gateway``); ``fieldchat.cli``
is the command line. Nothing is imported here, so a device loads only what it uses.
"""

__all__: list[str] = []
