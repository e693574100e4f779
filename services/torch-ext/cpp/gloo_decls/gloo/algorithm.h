// See ../README.md: only what c10d's ProcessGroupGloo.hpp needs to parse.
#pragma once
#include "gloo/context.h"
