"""The HTTP edge: authentication, typed errors and their handlers, request context, CORS, rate
limits, logging, bounded JSON, uploads and the API's request/response schemas. Everything here
knows Flask; nothing below it does.
"""
