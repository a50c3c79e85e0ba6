"""The untrusted side: the worker process that runs action code.

It validates each api call and forwards it to the supervisor; it holds no
authority and decides no policy. Entry point: ``python -m worker RFD WFD``
(normally started by ``runner``).
"""
