"""karyo.stain"""
