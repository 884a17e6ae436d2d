"""Names on the wire that servers and their clients share, in a module that imports nothing:
the server's hot path and the load generator both read them."""

# A server sets this header to "1" on an answer that waited for its model to load (a cold
# start of an on-demand model); it is absent on every other answer.
COLD_START_HEADER = "x-myriad-cold-start"
