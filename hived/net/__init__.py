"""Sockets: ZeroMQ on the asyncio loop, CURVE, addresses, and who may reach a control socket."""
