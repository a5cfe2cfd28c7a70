"""What the site's ClientApp (``client.client_app``) needs around its handlers: the node's facts,
the run config as a site reads it, the site's data, the state it keeps between rounds, the model
exchange, the site's half of secure counts, and errors safe to send to the server."""
