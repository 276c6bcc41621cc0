"""An app that extends remote control: an ``@inspect_command`` that reads the
app, a ``@control_command`` with arguments that changes something the next
call sees, one that raises, and tasks with attributes ``inspect registered``
shows. The queue comes from CONTROLAPP_QUEUE so that two workers under test
do not share one."""
