"""The coordinator's Flower adapters: the ServerApp (``server_app``: the federated day loop
over a Grid) and the SecAgg+ report rounds it drives (``secagg``)."""
