"""kdlab.losses"""
