"""The controller: cluster membership, the data-plane rendezvous and the versioned expert placement."""
