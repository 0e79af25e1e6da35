"""The only package that imports Ray: thin adapters of the plain library to Ray Data, Train, Tune, Serve."""
