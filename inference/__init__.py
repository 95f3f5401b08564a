"""KV-cache runtime, partial denoising, FDM-grounded asynchronous control and the websocket server.

Lands with the async-inference issue.
"""
