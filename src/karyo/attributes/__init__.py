"""karyo.attributes"""
