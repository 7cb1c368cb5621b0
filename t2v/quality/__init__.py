"""How good a video is: quality scores of any video from its pixels (assess), and the embedded model's prompt
adherence on the synthetic world (evaluate, behind `t2v eval`)."""
