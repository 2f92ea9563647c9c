"""karyo.infer"""
