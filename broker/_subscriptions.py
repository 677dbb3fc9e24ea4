"""The subscription index: which sessions a topic reaches, and with what options.

Pure (no I/O, no clock): exact filters in one dict, wildcard filters scanned, shared
subscriptions (``$share/<group>/<filter>``, MQTT 5 §4.8.2) by group, one member per
message, round robin preferring connected members.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from fieldchat.broker._session import SubOptions

__all__ = ["Match", "Merged", "Subscriptions", "matches", "valid_filter"]


def matches(topic: str, topic_filter: str) -> bool:
    """MQTT §4.7 topic filter matching (``$`` topics never match a leading wildcard)."""
    if topic_filter == topic:
        return True
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    t_levels = topic.split("/")
    f_levels = topic_filter.split("/")
    for i, level in enumerate(f_levels):
        if level == "#":
            return True
        if i >= len(t_levels) or (level != "+" and level != t_levels[i]):
            return False
    return len(t_levels) == len(f_levels)


def valid_filter(topic_filter: str) -> bool:
    """MQTT §4.7.1: non-empty; ``#`` only alone as the last level; ``+`` only alone."""
    if not topic_filter:
        return False
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return False
        if "+" in level and level != "+":
            return False
    return True


class Merged(NamedTuple):
    """A session matched by several subscriptions gets one copy (MQTT-3.3.4-3, -4)."""

    qos: int
    retain_as_published: bool
    identifiers: tuple[int, ...]


class Match(NamedTuple):
    """The sessions a topic reaches: ``targets`` by client id, and for those matched
    more than once, what their subscriptions add up to (``merged``)."""

    targets: dict[str, SubOptions]
    merged: dict[str, Merged]


def _merge(
    targets: dict[str, SubOptions], merged: dict[str, Merged], client_id: str, options: SubOptions
) -> None:
    """Add one matching subscription of ``client_id``: the highest QoS, Retain As
    Published if any asks, every Subscription Identifier."""
    held = targets.get(client_id)
    if held is None:
        targets[client_id] = options
        return
    qos, rap, identifiers = merged.get(client_id) or (
        held.qos,
        held.retain_as_published,
        (held.identifier,) if held.identifier else (),
    )
    if options.identifier:
        identifiers = (*identifiers, options.identifier)
    merged[client_id] = Merged(
        max(qos, options.qos), rap or options.retain_as_published, identifiers
    )
    if held.no_local and not options.no_local:  # another subscription wants it back
        targets[client_id] = SubOptions(held.qos, identifier=held.identifier)


class Subscriptions:
    """Every subscription of every session, indexed for :meth:`match`."""

    def __init__(self) -> None:
        self.exact: dict[str, dict[str, SubOptions]] = {}
        self.wild: dict[str, dict[str, SubOptions]] = {}
        self.shared: dict[tuple[str, str], dict[str, SubOptions]] = {}
        self._next_in_group: dict[tuple[str, str], int] = {}

    def add(self, client_id: str, topic_filter: str, options: SubOptions) -> None:
        key, index = self._index(topic_filter)
        index.setdefault(key, {})[client_id] = options

    def remove(self, client_id: str, topic_filter: str) -> None:
        key, index = self._index(topic_filter)
        subs = index.get(key)
        if subs is not None:
            subs.pop(client_id, None)
            if not subs:
                del index[key]

    def _index(self, topic_filter: str) -> tuple[Any, dict[Any, dict[str, SubOptions]]]:
        if topic_filter.startswith("$share/"):
            _, group, real = topic_filter.split("/", 2)
            return (group, real), self.shared
        if "+" in topic_filter or "#" in topic_filter:
            return topic_filter, self.wild
        return topic_filter, self.exact

    def match(self, topic: str, connected: Callable[[str], bool]) -> Match:
        """The sessions ``topic`` reaches; ``connected(client_id)`` steers the choice
        of a shared group's member."""
        targets: dict[str, SubOptions] = {}
        merged: dict[str, Merged] = {}
        subs = self.exact.get(topic)
        if subs:
            targets.update(subs)
        for topic_filter, subs in self.wild.items():
            if matches(topic, topic_filter):
                for client_id, options in subs.items():
                    _merge(targets, merged, client_id, options)
        for key, subs in self.shared.items():
            if subs and matches(topic, key[1]):
                client_id = self._pick(key, subs, connected)
                _merge(targets, merged, client_id, subs[client_id])
        return Match(targets, merged)

    def _pick(
        self, key: tuple[str, str], subs: dict[str, SubOptions], connected: Callable[[str], bool]
    ) -> str:
        """Round robin over a shared group, preferring connected members."""
        members = sorted(subs)
        start = self._next_in_group.get(key, 0)
        self._next_in_group[key] = start + 1
        for i in range(len(members)):
            candidate = members[(start + i) % len(members)]
            if connected(candidate):
                return candidate
        return members[start % len(members)]
