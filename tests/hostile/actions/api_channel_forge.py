"""Reaches the proxy's channel and sends a raw notification for a method post-login does not offer."""


def on_execute(event, api):
    api._ex.channel.queue([2, "validation.error", ["forged", "forged by the action"]])
