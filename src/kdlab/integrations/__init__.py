"""kdlab.integrations"""
