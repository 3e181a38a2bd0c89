"""Pure decision code: functions of their inputs, no I/O, no clock, no randomness they do not
receive. The services, the simulator and the tests share this one implementation
(``tests/unit/test_policy_purity.py`` fails if a module here imports an I/O library)."""
