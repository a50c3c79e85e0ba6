"""Spins forever and swallows every exception, BaseException included (KeyboardInterrupt, SystemExit, ...)."""
import signal


def on_execute(event, api):
    for sig in (signal.SIGALRM, signal.SIGXCPU, signal.SIGINT):
        try:
            signal.signal(sig, lambda *a: None)
        except BaseException:
            pass
    n = 0
    while True:
        try:
            while True:
                n += 1
        except BaseException:
            continue
