"""Fleet, catalog, packing problem and plan contracts, and the packer.

Pure Python: no Prefect, no torch.
"""
