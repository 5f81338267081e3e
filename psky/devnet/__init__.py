"""A local AT Protocol network on loopback (PLC, PDSes, relay, labeler) with injectable faults."""
