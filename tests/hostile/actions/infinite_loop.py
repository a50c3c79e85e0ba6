"""Spins forever: only the supervisor's wall-clock timer can end it."""


def on_execute(event, api):
    while True:
        pass
