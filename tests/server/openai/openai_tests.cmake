# The openai npm client suite (node's built-in runner) against `dsv4 serve`; each test file
# starts its own server on a free loopback port (DSV4_BINARY). Needs `npm ci` (scripts/test.sh
# runs scripts/fetch-test-data.sh, which installs the pinned openai package).
find_program(DSV4_NODE node)
if(NOT DSV4_NODE)
  message(WARNING "node not found: the openai-client server tests are not registered")
  return()
endif()
add_test(NAME server.openai_client
         COMMAND ${DSV4_NODE} --test ${CMAKE_CURRENT_LIST_DIR}/api.test.mjs ${CMAKE_CURRENT_LIST_DIR}/concurrency.test.mjs
                 ${CMAKE_CURRENT_LIST_DIR}/engine.test.mjs ${CMAKE_CURRENT_LIST_DIR}/bench.test.mjs
         WORKING_DIRECTORY ${PROJECT_SOURCE_DIR})
set_tests_properties(server.openai_client PROPERTIES LABELS "server" TIMEOUT 900
                     ENVIRONMENT "DSV4_BINARY=$<TARGET_FILE:dsv4>;NODE_PATH=${PROJECT_SOURCE_DIR}/node_modules;OMP_WAIT_POLICY=PASSIVE")
