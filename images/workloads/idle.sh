# Nothing but the shell and the heartbeat.
while true; do sleep 60; done
