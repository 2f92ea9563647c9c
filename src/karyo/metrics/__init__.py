"""karyo.metrics"""
