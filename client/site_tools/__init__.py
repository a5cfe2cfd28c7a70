"""``flwr-client``: the commands a hospital's IT runs (check, prepare, start a SuperNode)."""
